"""Pure decision logic: arms, tiers, aggregation, utilities, PSST. No I/O imports here."""
