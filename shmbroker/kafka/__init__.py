"""The Kafka listener (issue 7): a supervised ``shmbroker: kafka`` process that speaks Kafka's
classic (non-flexible) wire protocol, so unmodified Kafka clients produce into and fetch from
the partitions (docs/design/kafka.md)."""
