"""Proposers decide *what to try*: they turn a ProposalContext into a Proposal."""
