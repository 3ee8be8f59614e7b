"""The gateway's HTTP routes (OpenAI API, feedback, admin, reload)."""

__all__: list[str] = []
