"""Data on disk: image folders, image files, token shards and the tokenizing that writes them."""
