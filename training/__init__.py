"""Training: build the autoencoder, train it, and export the model artifact."""
