"""Where `stages.ingest` reads from: the demo's pinned wheels, your files, 🤗 datasets and BEIR folders."""
