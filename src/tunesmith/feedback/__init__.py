"""Human feedback: a page where reviewers rate model outputs, a durable store, and preference-pair export."""
