"""fixative.consistency — coming next; stands on fixative.core."""
