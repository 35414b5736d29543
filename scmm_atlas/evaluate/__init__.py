"""Quality metrics shared by our model and the peers, so that every method is scored the same way."""
