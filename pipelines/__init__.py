"""One thin module per pipeline stage; each is a `lrreid <stage>` command and a dvc.yaml stage."""
