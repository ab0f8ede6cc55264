"""The process tree: the rank's supervisor, the children it forks (through one zygote per
rank or one per node) or runs in its own process, and start-up. May import every room
below it; nothing below imports it.
"""
