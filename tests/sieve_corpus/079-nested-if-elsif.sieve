# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require "fileinto";
if header :contains "subject" "nothing" {
  fileinto "A";
} elsif header :contains "subject" "weekly" {
  if address :domain :is "from" "example.org" {
    fileinto "B";
  } else {
    fileinto "C";
  }
} elsif true {
  fileinto "D";
} else {
  fileinto "E";
}
