"""Dark Tower Global Controller."""
