"""What operators watch: dashboards as code and the Prometheus configuration."""
