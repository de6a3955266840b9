"""The running daemon: threads and signals, the watcher, the control socket, sd_notify."""
