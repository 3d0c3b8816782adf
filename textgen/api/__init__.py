"""HTTP layer: error handling, request schemas and the routes."""
