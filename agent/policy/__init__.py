"""Network policy enforcement on the gateway: `applier` checks a signed policy, compiles it with
`wire.policy_nft` (the same compiler the fleet renders with), applies it with `nft` (`nft`
module) under commit-confirm, and reports its counters. Nothing is imported here, so that a
gateway that does not enforce policies never loads the policy model."""
