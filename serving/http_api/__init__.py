"""KServe v2 (Open Inference Protocol) over HTTP/REST, and the page where a person draws a digit.

aiohttp on the same asyncio loop as grpc.aio, over the same ServedModel and batcher. `codec`
turns REST bodies into arrays and back (pure), `status` maps the model core's errors to HTTP
codes (the one table for this transport), `app` holds the routes and the server's lifecycle,
and `page` serves the drawing page from `static/`.
"""
