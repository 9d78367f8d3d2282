"""What producers and workers share: the schemas (`models`), settings (`config`), the job store (`store`),
the queue contract (`queue`), the live event stream (`events`) and the job record's rules (`job_record`)."""
