"""What must survive a crash: store, journal, file operations, reconcile, quarantine, lock."""
