"""The gate: the checks an unlearned model must pass to be registered, decided on evidence (docs/GATE.md),
and the residual-knowledge probe."""
