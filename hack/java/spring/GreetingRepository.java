package kite.bench;

import org.springframework.beans.factory.InitializingBean;
import org.springframework.jdbc.core.JdbcTemplate;

/** The greetings table: created and filled when the context starts. */
public class GreetingRepository implements InitializingBean {
    private final JdbcTemplate jdbc;

    public GreetingRepository(JdbcTemplate jdbc) {
        this.jdbc = jdbc;
    }

    @Override
    public void afterPropertiesSet() {
        jdbc.execute("CREATE TABLE IF NOT EXISTS greeting (id INT PRIMARY KEY, text VARCHAR(100), created TIMESTAMP)");
        jdbc.update("MERGE INTO greeting KEY (id) VALUES (?, ?, CURRENT_TIMESTAMP)", 1, "hello from spring");
    }

    public Greeting find(int id) {
        return jdbc.queryForObject("SELECT id, text, created FROM greeting WHERE id = ?",
            (rs, row) -> new Greeting(rs.getInt("id"), rs.getString("text"), rs.getTimestamp("created").toInstant().toString()),
            id);
    }
}
