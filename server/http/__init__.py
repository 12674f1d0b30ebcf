"""The HTTP frontend: the FastAPI app, native and OpenAI routes, schemas, the OpenAPI document, the key guard,
the playground.
"""
