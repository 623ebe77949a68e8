"""The ServerApp: strategy assembly, reply checks, the run folder."""
