"""activation passes."""
