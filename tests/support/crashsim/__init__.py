"""Crash-state exploration: record segd's file-system calls, build every state a power cut
could leave, run start-up recovery on each, check the invariant.

After SQLite's crash tests and ALICE (Pillai et al., OSDI 2014). Modules:
- `strace`: run a program under strace, parse the log into system calls;
- `fsmodel`: a tree as inodes, and the operations that change it;
- `replay`: system calls -> operations on the tree's inodes;
- `states`: the persistence models, and the crash states they allow;
- `check`: one state on disk, recovery, the invariant;
- `scenario`: the recorded runs of the real daemon;
- `explore`: all of it over a scenario, with the figures.
"""
