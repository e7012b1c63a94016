"""The fleet's HTTP door: an OpenAI-compatible gateway (`fleet serve`).

Apps in any language send chat completions (or jobs nobody waits on) with a bearer key
per app; each key carries the app's budgets and limits. Behind the door the gateway uses
only the fleet's public API: `router` (dispatch, routing, the catalog), the live state of
apps (`workers.state.apps`), the ledger's key table, and a job's stored state. See
docs/architecture.md, "The gateway".
"""
