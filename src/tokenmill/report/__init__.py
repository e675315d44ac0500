"""The run report: one self-contained HTML page that shows what each stage of a run did."""
