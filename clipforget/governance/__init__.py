"""The governance domain: deletion requests and model policies, the hash-chained ledger, compliance findings."""
