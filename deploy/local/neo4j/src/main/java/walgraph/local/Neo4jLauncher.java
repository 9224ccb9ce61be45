/*
 * Neo4jLauncher: the Neo4j that walgraph's local development and tests talk to.
 * deploy/local/services builds, starts and stops it; it never ships.
 *
 * It runs an embedded Neo4j 5.26 LTS, community edition, in one JVM:
 *   - every file lives under <home> (data/, logs/), so a restart reuses the data;
 *   - Bolt only, plain text, on 127.0.0.1:<port>; authentication is on;
 *   - the password of user "neo4j" is made the one in <password-file>: at first
 *     start (over the built-in default) and whenever the file no longer matches;
 *   - it prints "walgraph-neo4j: ready ..." once a real Bolt session logged in
 *     with that password has run a query;
 *   - on SIGTERM/SIGINT a shutdown hook shuts the DBMS down cleanly.
 *
 * Usage:
 *   java -cp 'target/classes:target/lib/*' walgraph.local.Neo4jLauncher <home> <port> <password-file>
 *   java -cp ... walgraph.local.Neo4jLauncher check <port>
 *       (password from env WALGRAPH_NEO4J_PASSWORD; exit 0 if a session works, 1 otherwise)
 * Env: WALGRAPH_NEO4J_PAGECACHE_MB (default 256).
 */
package walgraph.local;

import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Map;
import org.neo4j.configuration.GraphDatabaseInternalSettings;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.connectors.HttpConnector;
import org.neo4j.configuration.connectors.HttpsConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;

public final class Neo4jLauncher {
    private static final String HOST = "127.0.0.1";

    /** Extra Neo4j settings, for diagnosis ("key=value;key=value"), as a file of them in home. */
    private static Path extraSettings(Path home, String spec) throws java.io.IOException {
        StringBuilder out = new StringBuilder();
        for (String part : spec.split(";")) {
            if (part.indexOf('=') > 0) {
                out.append(part.strip()).append('\n');
            }
        }
        Files.createDirectories(home);
        Path file = home.resolve("extra-settings.conf");
        Files.writeString(file, out.toString());
        return file;
    }

    public static void main(String[] args) throws Exception {
        if (args.length == 2 && args[0].equals("check")) {
            String problem = boltCheck(Integer.parseInt(args[1]), System.getenv().getOrDefault("WALGRAPH_NEO4J_PASSWORD", ""));
            if (problem != null) {
                System.err.println("walgraph-neo4j: check failed: " + problem);
            }
            System.exit(problem == null ? 0 : 1);
        }
        if (args.length != 3) {
            System.err.println("usage: Neo4jLauncher <home> <port> <password-file> | check <port>");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        int port = Integer.parseInt(args[1]);
        String password = Files.readString(Path.of(args[2])).strip();
        long pageCacheMb = Long.parseLong(System.getenv().getOrDefault("WALGRAPH_NEO4J_PAGECACHE_MB", "256"));

        log("starting in " + home + ", Bolt on " + HOST + ":" + port);
        DatabaseManagementService dbms = new DatabaseManagementServiceBuilder(home)
                .setConfig(BoltConnector.enabled, true)
                .setConfig(BoltConnector.listen_address, new SocketAddress(HOST, port))
                .setConfig(BoltConnector.encryption_level, BoltConnector.EncryptionLevel.DISABLED)
                .setConfig(HttpConnector.enabled, false)
                .setConfig(HttpsConnector.enabled, false)
                .setConfig(GraphDatabaseSettings.routing_enabled, false) // no extra listener on :7688
                .setConfig(GraphDatabaseSettings.auth_enabled, true)
                .setConfig(GraphDatabaseSettings.auth_max_failed_attempts, 0) // tests try wrong passwords: no lock-out
                .setConfig(GraphDatabaseSettings.pagecache_memory, pageCacheMb * 1024 * 1024)
                .setConfig(GraphDatabaseSettings.keep_logical_logs, "2 files")
                .setConfig(GraphDatabaseSettings.logical_log_rotation_threshold, 64L * 1024 * 1024)
                .setConfig(GraphDatabaseSettings.preallocate_logical_logs, false)
                // Quick stops for restart tests: open transactions get 2 s (not 10) to end,
                // and Bolt's netty does not wait for 5 s of quiet before it stops.
                .setConfig(GraphDatabaseSettings.shutdown_transaction_end_timeout, Duration.ofSeconds(2))
                .setConfig(GraphDatabaseInternalSettings.netty_server_shutdown_quiet_period, 0)
                .loadPropertiesFromFile(extraSettings(home, System.getenv().getOrDefault("WALGRAPH_NEO4J_SETTINGS", "")))
                .build();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            log("shutting down");
            dbms.shutdown();
            log("stopped");
        }, "walgraph-neo4j-shutdown"));

        String problem = boltCheck(port, password);
        if (problem != null && problem.contains("Security.Unauthorized")) {
            // First start (user neo4j still has the built-in default password), or the
            // password file changed: set it through the system database. Community
            // edition supports ALTER USER; embedded calls run with full rights.
            log("setting the password of user neo4j");
            dbms.database(GraphDatabaseSettings.SYSTEM_DATABASE_NAME).executeTransactionally(
                    "ALTER USER neo4j SET PASSWORD $password CHANGE NOT REQUIRED", Map.of("password", password));
            problem = boltCheck(port, password);
        }
        if (problem != null) {
            log("FAILED: no authenticated Bolt session: " + problem);
            System.exit(1); // the shutdown hook stops the DBMS
        }
        String version = dbms.database(GraphDatabaseSettings.SYSTEM_DATABASE_NAME).executeTransactionally(
                "CALL dbms.components() YIELD versions, edition RETURN versions[0] + ' ' + edition AS v",
                Map.of(), r -> r.hasNext() ? String.valueOf(r.next().get("v")) : "?");
        log("ready bolt://" + HOST + ":" + port + " (Neo4j " + version + ", user neo4j)");
        Thread.currentThread().join(); // until SIGTERM
    }

    private static void log(String message) {
        System.out.println("walgraph-neo4j: " + message);
        System.out.flush();
    }

    /**
     * Logs in over Bolt as neo4j with the password and runs RETURN 1, retrying for a
     * few seconds while the port refuses connections. Returns null on success, else
     * what went wrong. A minimal Bolt 5.0 / 4.4 client, so that no driver (and no
     * second netty version) is needed on the classpath.
     */
    static String boltCheck(int port, String password) throws InterruptedException {
        String problem = null;
        for (int attempt = 0; attempt < 20; attempt++) {
            try (Socket socket = new Socket()) {
                socket.connect(new InetSocketAddress(HOST, port), 5000);
                socket.setSoTimeout(15000);
                DataOutputStream out = new DataOutputStream(socket.getOutputStream());
                DataInputStream in = new DataInputStream(socket.getInputStream());
                out.write(new byte[] {0x60, 0x60, (byte) 0xB0, 0x17, 0, 0, 0, 5, 0, 0, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0});
                out.flush();
                if (in.readInt() == 0) {
                    return "server speaks neither Bolt 5.0 nor 4.4";
                }
                ByteArrayOutputStream hello = message(0xB1, 0x01);
                hello.write(0xA4);
                for (String s : new String[] {"user_agent", "walgraph-local/1", "scheme", "basic",
                        "principal", "neo4j", "credentials", password}) {
                    string(hello, s);
                }
                send(out, hello);
                ByteArrayOutputStream run = message(0xB3, 0x10);
                string(run, "RETURN 1");
                run.write(0xA0); // no parameters
                run.write(0xA0); // no extra
                send(out, run);
                ByteArrayOutputStream pull = message(0xB1, 0x3F);
                pull.write(0xA1);
                string(pull, "n");
                pull.write(0xFF); // -1: all records
                send(out, pull);
                int records = 0;
                for (int successes = 0; successes < 3; ) { // HELLO, RUN, PULL
                    byte[] reply = receive(in);
                    switch (reply[1]) {
                        case 0x70 -> successes++;
                        case 0x71 -> records++;
                        default -> {
                            return "server said: " + printable(reply);
                        }
                    }
                }
                return records == 1 ? null : "RETURN 1 gave " + records + " records";
            } catch (IOException e) {
                problem = e.toString();
                Thread.sleep(500);
            }
        }
        return problem;
    }

    private static ByteArrayOutputStream message(int structMarker, int signature) {
        ByteArrayOutputStream m = new ByteArrayOutputStream();
        m.write(structMarker);
        m.write(signature);
        return m;
    }

    private static void string(ByteArrayOutputStream m, String s) {
        byte[] b = s.getBytes(StandardCharsets.UTF_8);
        if (b.length < 16) {
            m.write(0x80 | b.length);
        } else if (b.length < 256) {
            m.write(0xD0);
            m.write(b.length);
        } else {
            m.write(0xD1);
            m.write(b.length >> 8);
            m.write(b.length & 0xFF);
        }
        m.writeBytes(b);
    }

    private static void send(DataOutputStream out, ByteArrayOutputStream m) throws IOException {
        out.writeShort(m.size()); // our messages are far below one chunk's 64 KiB
        m.writeTo(out);
        out.writeShort(0);
        out.flush();
    }

    private static byte[] receive(DataInputStream in) throws IOException {
        ByteArrayOutputStream m = new ByteArrayOutputStream();
        while (true) {
            int size = in.readUnsignedShort();
            if (size == 0) {
                if (m.size() > 0) {
                    return m.toByteArray();
                }
                continue; // NOOP chunk
            }
            m.writeBytes(in.readNBytes(size));
        }
    }

    /** The strings of a FAILURE message's metadata map, e.g. "code: ..., message: ...". */
    private static String printable(byte[] reply) {
        StringBuilder s = new StringBuilder();
        int i = 3; // struct marker, signature, map marker
        int strings = 0;
        while (i < reply.length) {
            int marker = reply[i] & 0xFF;
            int size;
            if ((marker & 0xF0) == 0x80) {
                size = marker & 0x0F;
                i += 1;
            } else if (marker == 0xD0 && i + 1 < reply.length) {
                size = reply[i + 1] & 0xFF;
                i += 2;
            } else if (marker == 0xD1 && i + 2 < reply.length) {
                size = ((reply[i + 1] & 0xFF) << 8) | (reply[i + 2] & 0xFF);
                i += 3;
            } else {
                break; // not a string: good enough for an error message
            }
            size = Math.min(size, reply.length - i);
            s.append(new String(reply, i, size, StandardCharsets.UTF_8)).append(strings++ % 2 == 0 ? ": " : ", ");
            i += size;
        }
        return s.length() > 0 ? s.substring(0, s.length() - 2) : "message 0x" + Integer.toHexString(reply[1] & 0xFF);
    }
}
