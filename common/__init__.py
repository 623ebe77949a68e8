"""What the server and the sites must agree on: config, backbones, head, exchange."""
