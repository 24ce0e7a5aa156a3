"""Human review: the review page (server, store), review policies and the gate they feed."""
