"""The ClientApp and everything a site runs: data, feature cache, local training."""
