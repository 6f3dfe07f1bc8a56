"""All of the GC's SQL, one module per table family (asyncio-flavoured)."""
