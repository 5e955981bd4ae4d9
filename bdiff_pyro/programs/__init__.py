"""The Pyro programs: the forward chain, the reverse process, samplers and exact enumeration."""
