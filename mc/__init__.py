"""Dark Tower Meeting Controller (implemented by a later issue)."""
