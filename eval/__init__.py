"""fixative.eval — coming next; stands on fixative.core."""
