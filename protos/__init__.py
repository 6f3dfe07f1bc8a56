"""Protocol definitions and the grpclib code generated from them."""
