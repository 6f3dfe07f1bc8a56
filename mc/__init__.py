"""Dark Tower Meeting Controller: hosts meetings behind a Redis fencing token."""
