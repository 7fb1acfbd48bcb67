"""Astrolabe NFT: the pure loss and controllers (`loss`), the streaming window that evaluates the loss
chunk by chunk through rolling KV caches (`streaming`), and the objective the learner trains with:
adapters, regularisers, EMA and one iteration (`objective`)."""
