"""Secrets and trust: the job's TLS credentials, private directories, refusing files another
user could have written, and the scheduler file. May import ``hpc`` and ``base``.
"""
