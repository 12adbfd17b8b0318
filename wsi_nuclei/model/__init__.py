"""The model: card and weights, inference backends, quantisation, TTA, inference, memory plan."""
