"""One-shot jobs over a folder: list, embed, cluster and place every image once."""
