"""Human escalation: the third tier, where a person answers.

Modules::

    model.py         Escalation (the record), NewEscalation, Status, StoreConflict/StoreMissing
    store.py         EscalationStore (the interface) and open_store(settings)
    sqlite_store.py  SQLite (embedded default; WAL, durable on commit)
    redis_store.py   Redis (a hash per escalation, an event stream, Lua transitions)
    service.py       EscalationService: store + metrics + webhook + waiting for answers + expiry
    webhook.py       POST new escalations to a URL, retried with backoff, off the request path
    completion.py    chat.completion bodies and SSE chunks for tickets and human answers
    handler.py       the human tier on the request path (mode ticket | hold)
    routes.py        /v1/escalations (client polling, reviewer API) and /review
    page.py          the reviewer page (HTML, CSS, vanilla JS; content rendered as text only)
    config.py        one-line descriptions for `sparsity-router check`
"""

from __future__ import annotations

__all__: list[str] = []
