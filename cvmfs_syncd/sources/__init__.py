"""The inputs of a repository: staging directories and S3 prefixes, each observed and
planned into ops for the lane, never written to the repository by themselves."""
