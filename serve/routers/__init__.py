"""The app's routes, one ``APIRouter`` per API: ``ops`` (health, readiness, metrics, the playground),
``openai`` (the OpenAI images API), ``a1111`` (the AUTOMATIC1111 API)."""
