"""Where promoted versions are published (MLflow Model Registry), through a durable outbox."""
