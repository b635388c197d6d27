"""fixative.cloak — coming next; stands on fixative.core."""
