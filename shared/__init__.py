"""Code both services share: config, auth, logging, metrics, the trio/asyncio seam, dev stack."""
