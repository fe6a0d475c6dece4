"""`mlx-deepseek serve`: an OpenAI- and Ollama-compatible HTTP server.

engine.py runs the model (continuous batching, prefix cache, MTP for a lone request);
app.py the HTTP endpoints (starlette, served by uvicorn); protocol.py validates requests;
chat.py turns messages into prompts and model text into reasoning / content / tool calls.
"""
