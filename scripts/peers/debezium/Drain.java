// The Debezium peer of scripts/bench-drain: Debezium's embedded engine (the async engine of
// debezium-embedded, the PostgreSQL connector with pgoutput, no Kafka) on an existing slot,
// counting the change records of one table until it has seen EXPECTED of them; then it
// prints what it saw and exits. Each record is a Kafka Connect SourceRecord whose value is the
// Debezium envelope (before, after, source, op) as a Struct: decoded, not serialized to JSON.
//
//   java -cp "classes:lib/*" Drain HOST PORT USER DBNAME SLOT PUBLICATION TABLE EXPECTED MODE
//
// MODE `stream` starts from the slot's position and snapshots nothing (snapshot.mode
// no_data): the drain. MODE `snapshot` reads the table first (snapshot.mode initial) and
// counts its `r` (read) records: the initial snapshot. Besides Debezium's defaults it sets the
// throughput knobs Debezium documents (max.batch.size, max.queue.size, poll.interval.ms,
// snapshot.fetch.size), from the environment when given (DBZ_MAX_BATCH_SIZE, ...). Prints
// `rows=N first_to_last_s=S settings=...` on standard error.
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.source.SourceRecord;

public final class Drain {
    private static String env(String name, String fallback) {
        String v = System.getenv(name);
        return v == null || v.isBlank() ? fallback : v;
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 9) {
            System.err.println("usage: Drain HOST PORT USER DBNAME SLOT PUBLICATION TABLE EXPECTED stream|snapshot");
            System.exit(2);
        }
        String table = args[6];
        long expected = Long.parseLong(args[7]);
        boolean snapshot = args[8].equals("snapshot");
        Properties p = new Properties();
        p.setProperty("name", "inventorysync-bench-peer");
        p.setProperty("connector.class", "io.debezium.connector.postgresql.PostgresConnector");
        p.setProperty("offset.storage", "org.apache.kafka.connect.storage.MemoryOffsetBackingStore");
        p.setProperty("offset.flush.interval.ms", "1000");
        p.setProperty("database.hostname", args[0]);
        p.setProperty("database.port", args[1]);
        p.setProperty("database.user", args[2]);
        p.setProperty("database.password", env("PGPASSWORD", ""));
        p.setProperty("database.dbname", args[3]);
        p.setProperty("topic.prefix", "bench");
        p.setProperty("plugin.name", "pgoutput");
        p.setProperty("slot.name", args[4]);
        p.setProperty("publication.name", args[5]);
        p.setProperty("publication.autocreate.mode", "disabled");
        p.setProperty("table.include.list", table);
        p.setProperty("snapshot.mode", snapshot ? "initial" : "no_data");
        // The throughput settings Debezium documents (defaults 2048, 8192, 500, 10240).
        p.setProperty("max.batch.size", env("DBZ_MAX_BATCH_SIZE", "20480"));
        p.setProperty("max.queue.size", env("DBZ_MAX_QUEUE_SIZE", "81920"));
        p.setProperty("poll.interval.ms", env("DBZ_POLL_INTERVAL_MS", "10"));
        p.setProperty("snapshot.fetch.size", env("DBZ_SNAPSHOT_FETCH_SIZE", "20480"));
        String settings = String.format("max.batch.size=%s max.queue.size=%s poll.interval.ms=%s snapshot.fetch.size=%s",
                p.getProperty("max.batch.size"), p.getProperty("max.queue.size"),
                p.getProperty("poll.interval.ms"), p.getProperty("snapshot.fetch.size"));

        String topic = "bench." + table;
        AtomicLong rows = new AtomicLong();
        AtomicLong first = new AtomicLong();
        AtomicLong last = new AtomicLong();
        CountDownLatch done = new CountDownLatch(1);
        CountDownLatch stopped = new CountDownLatch(1);
        DebeziumEngine.ChangeConsumer<RecordChangeEvent<SourceRecord>> consumer = (records, committer) -> {
            for (RecordChangeEvent<SourceRecord> r : records) {
                SourceRecord sr = r.record();
                if (topic.equals(sr.topic()) && sr.value() instanceof Struct v) {
                    String op = v.getString("op");
                    boolean counted = snapshot ? "r".equals(op) : !"r".equals(op);
                    if (counted) {
                        long n = rows.incrementAndGet();
                        long now = System.nanoTime();
                        first.compareAndSet(0, now);
                        last.set(now);
                        if (n == expected) {
                            done.countDown();
                        }
                    }
                }
                committer.markProcessed(r);
            }
            committer.markBatchFinished();
        };
        DebeziumEngine<RecordChangeEvent<SourceRecord>> engine = DebeziumEngine
                .create(ChangeEventFormat.of(io.debezium.embedded.Connect.class))
                .using(p)
                .using((success, message, error) -> {
                    if (!success && done.getCount() > 0) {
                        System.err.println("error: " + message + (error == null ? "" : ": " + error));
                    }
                    stopped.countDown();
                })
                .notifying(consumer)
                .build();
        ExecutorService executor = Executors.newSingleThreadExecutor();
        executor.execute(engine);
        while (!done.await(100, TimeUnit.MILLISECONDS)) {
            if (stopped.getCount() == 0) {
                System.err.println("rows=" + rows.get() + " (the engine stopped before " + expected + ")");
                System.exit(1);
            }
        }
        System.err.printf("rows=%d first_to_last_s=%.3f settings=%s%n", rows.get(),
                (last.get() - first.get()) / 1e9, settings);
        engine.close();
        executor.shutdown();
        executor.awaitTermination(10, TimeUnit.SECONDS);
        System.exit(0);
    }
}
