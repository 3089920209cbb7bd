package kite.bench;

import javax.sql.DataSource;
import org.h2.jdbcx.JdbcDataSource;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.web.servlet.config.annotation.EnableWebMvc;

/** The application context: an H2 database in memory, its repository and the controller. */
@Configuration
@EnableWebMvc
public class BenchConfig {
    @Bean
    public DataSource dataSource() {
        JdbcDataSource ds = new JdbcDataSource();
        // In memory, kept while the JVM runs (not only while a connection is open).
        ds.setURL("jdbc:h2:mem:bench;DB_CLOSE_DELAY=-1");
        ds.setUser("sa");
        return ds;
    }

    @Bean
    public JdbcTemplate jdbcTemplate() {
        return new JdbcTemplate(dataSource());
    }

    @Bean
    public GreetingRepository greetingRepository() {
        return new GreetingRepository(jdbcTemplate());
    }

    @Bean
    public GreetingController greetingController() {
        return new GreetingController(greetingRepository());
    }
}
