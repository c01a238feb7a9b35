"""How bert-stream runs: the local stack (``deploy.local``), container images and Kubernetes manifests."""
