"""What people see of studies and may do to them: the worklist and study detail read model (findings, timeline)
and the operator actions on a study (retry analysis, resend to the PACS), shared by the CLI and the web UI."""
