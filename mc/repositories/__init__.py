"""All of the MC's Redis access, one module per key family (trio-flavoured)."""
